"""The toolkit's own exception classes: bad input (CLI exit code 2) and failed numerics."""


class UserError(ValueError):
    """Bad input: a setting, path, data source or model the toolkit cannot work with."""


class NumericalError(RuntimeError):
    """A solve that could not be completed with finite numbers."""


class TrainingDivergedError(NumericalError, FloatingPointError):
    """A non-finite training loss: the CLI reports it in one line (exit 1); Python callers that
    catch ``FloatingPointError``, as documented before this class existed, still do."""


class NonFiniteError(UserError):
    """NaN or Inf in a model's weights or activations, named where found: nothing sound can be
    pruned from or against it."""
