"""What every entry point in jobs/ does before handing its arguments to the `restoration` command: `python
jobs/restore.py ARGS` is `restoration restore ARGS` run as a Ray job driver, with line-buffered output.
"""

import sys

from restoration.cli import main


def run(argv: list[str]) -> int:
    """Run `restoration ARGV` as a Ray job driver.

    Args:
        argv: the command and its arguments, e.g. ["restore", "s3://bucket/in", "s3://bucket/out"].

    Returns:
        The exit status: 0, 2 for a bad argument or an unusable input (one line on stderr), 130 when interrupted.
    """
    # `ray job logs -f` shows each line when it is printed, not when a block buffer fills.
    sys.stdout.reconfigure(line_buffering=True)
    return main(argv)
