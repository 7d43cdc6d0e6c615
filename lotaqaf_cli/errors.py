"""User-facing errors: anything a user can cause ends in one clear line and exit code 2."""


class LotaqafError(Exception):
    """An error the user can fix (bad recipe, bad key, missing model, corrupt file...)."""

    exit_code = 2
