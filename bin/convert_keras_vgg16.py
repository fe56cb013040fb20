r"""Convert a keras.applications.VGG16 weights file into our VGG-16-BN backbone weights
(the paper's "ImageNet" initialisation). Nothing is downloaded: give a local file.

Example:
  python bin/convert_keras_vgg16.py \
      --keras_weights=vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 \
      --output=weights/vgg16_imagenet.weights.h5
  python bin/train_mm.py --flagfile=flags/voc_vgg16_random_mm.flags \
      --init=weights/vgg16_imagenet.weights.h5 --workdir=work/voc_vgg16_imagenet_mm

Conv biases become BN betas with identity BN; conv1_1's input channels are reversed
(Keras' VGG16 reads BGR, our rgb mode RGB); with the classifier, fc1/fc2 become the
convolutional fc6/fc7 (without it they keep a seeded random initialisation). Use the
output with --input_mode=rgb. See mm_tf/models/imagenet.py for the .npz format of
weights converted from other frameworks.
"""

import flagdefs
from absl import app
from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string("keras_weights", None,
                    "keras.applications.VGG16 weights (.weights.h5 or legacy .h5).")
flags.DEFINE_string("output", None, "Backbone weights to write (.weights.h5 or .npz).")
flags.DEFINE_enum("include_top", "auto", ["auto", "yes", "no"],
                  "Whether the file holds fc1/fc2 (auto: read it from the file).")
flags.DEFINE_integer("seed", 0, "Seed of fc6/fc7's initialisation when there is no top.")
flags.mark_flag_as_required("keras_weights")
flags.mark_flag_as_required("output")


def main(argv):
    del argv
    # Imported here so --help is instant and flag errors come before TensorFlow loads.
    from mm_tf.models import imagenet
    from mm_tf.models.weights import WeightsMismatchError

    include_top = {"auto": None, "yes": True, "no": False}[FLAGS.include_top]
    try:
        result = imagenet.convert_keras_vgg16_file(FLAGS.keras_weights, FLAGS.output,
                                                   include_top=include_top, seed=FLAGS.seed)
    except (FileNotFoundError, ValueError, WeightsMismatchError) as e:
        flagdefs.fail(str(e))
    top = "with fc6/fc7" if result["include_top"] else "conv layers only (fc6/fc7 random)"
    print(f"converted {FLAGS.keras_weights} -> {result['output']} ({top}); "
          "use it with --input_mode=rgb")


if __name__ == "__main__":
    app.run(main)
