"""Errors that mean "the input is wrong": reported as one line, without a traceback."""


class UserError(Exception):
    pass
