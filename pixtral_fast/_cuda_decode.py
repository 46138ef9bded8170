"""Placeholder: being written."""


def available() -> bool:
    return False
