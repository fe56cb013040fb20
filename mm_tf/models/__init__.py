"""Backbones (VGG-16-BN, AlexNet-BN), segmentation heads and backbone weight files."""

from mm_tf.models.backbones import (BACKBONES, build_backbone, endpoint_channels,
                                    endpoint_names, endpoint_strides, input_channels,
                                    pool5_model)
from mm_tf.models.heads import (HEADS, FCNHead, HypercolumnHead, SegmentationModel,
                                build_segmentation_model, sample_bilinear, sample_points)
from mm_tf.models.weights import (WeightsFileError, WeightsMismatchError,
                                  check_weights_file, load_backbone_weights, load_npz,
                                  save_backbone_weights, save_npz)
