"""The one exception type of mm_tf.data: a data set on disk is not what was expected."""


class DatasetError(ValueError):
    """A data set, list file or flag is missing or malformed; the message names which."""
