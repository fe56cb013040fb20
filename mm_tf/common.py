"""Constants shared across mm_tf: dictionary keys and the canonical ignore label.

Every key of a feature/batch dictionary lives here, so that the data pipeline, the
models and the binaries cannot drift apart on spelling.
"""

# Batch dictionaries produced by mm_tf.data.pipeline and consumed by models.
IMAGE = "image"  # float32 [B, H, W, C]: normalised network input (C = 3 rgb, 1 grey).
LABEL = "label"  # int32 [B, H, W]: train ids, IGNORE_LABEL where unlabelled/padded.
RAW_IMAGE = "raw_image"  # uint8 [B, H, W, 3]: the augmented image before normalisation.
FILENAME = "filename"  # string [B]: source image path (eval pipeline only).
HEIGHT = "height"  # int32 [B]: original image height (eval pipeline only).
WIDTH = "width"  # int32 [B]: original image width (eval pipeline only).

# After label mapping every data set uses this value for "ignore" (VOC's convention).
IGNORE_LABEL = 255

# Backbone input modes.
INPUT_RGB = "rgb"  # RGB, per-channel ImageNet mean subtracted, 0..255 scale (Caffe).
INPUT_GREY = "grey"  # mean of RGB, scaled to [0, 1], minus GREY_SHIFT (colorization).
INPUT_MODES = (INPUT_RGB, INPUT_GREY)
RGB_MEAN = (123.68, 116.779, 103.939)
GREY_SHIFT = 0.4488

# A trained segmentation model's files in its run folder (bin/train_seg.py --workdir).
MODEL_WEIGHTS = "model.weights.h5"
MODEL_CONFIG = "model_config.json"
