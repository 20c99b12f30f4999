"""``python -m calibrate``: the command (``main``) and its ``--check`` mode (``check``)."""
