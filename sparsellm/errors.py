"""The one base class for problems with what the user asked for (CLI exit code 2)."""


class UserError(ValueError):
    """Bad input: a setting, path, data source or model the toolkit cannot work with."""
