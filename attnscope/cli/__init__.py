"""The `attnscope` command line: parse, call a command, show the result. No science here.

`app.py` builds the Typer app and registers one function per command module; the entry
point is `attnscope.cli.app:main`. Heavy imports (torch, timm, seaborn) happen inside
command bodies so `attnscope --help` answers instantly.
"""
