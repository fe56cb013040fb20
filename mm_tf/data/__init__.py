"""Data sets: readers of the on-disk layouts, the checker, the input pipeline.

Only the light, TensorFlow-free entry points are re-exported here, so that
`import mm_tf.data` stays cheap for the checker and the converters.
"""

from mm_tf.data.datasets import DatasetInfo, check_dataset, check_pair, read_dataset
from mm_tf.data.errors import DatasetError

__all__ = ["DatasetError", "DatasetInfo", "check_dataset", "check_pair", "read_dataset"]
