"""Errors that mean "the input is wrong": the tools report them as one line, without a traceback."""


class UserError(Exception):
    pass
