"""The compiled part of sandboxd: ``sandboxd.jail.child._spawn`` (everything else is in
pyproject.toml; setuptools reads both)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sandboxd.jail.child._spawn", ["sandboxd/jail/child/_spawn.c"],
                             extra_compile_args=["-Wall", "-Wextra", "-Werror"])])
