"""The exception types of mm_tf.data: a data set on disk is not what was expected."""


class DatasetError(ValueError):
    """A data set, list file or flag is missing or malformed; the message names which."""


class DataCheckError(DatasetError):
    """Several files of a data set are bad (every problem found, not the first).

    `problems` holds one line per problem, each naming its file; the message is one line
    that counts them and repeats the first, so that it still names a file when printed
    alone after the list.
    """

    def __init__(self, problems):
        self.problems = list(problems)
        count = len(self.problems)
        if count == 1:
            message = self.problems[0]
        else:
            message = f"{count} data problems; the first: {self.problems[0]}"
        super().__init__(message)
