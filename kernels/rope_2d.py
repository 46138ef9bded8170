"""Placeholder: being written."""


def compile_specs(capability):
    raise NotImplementedError
