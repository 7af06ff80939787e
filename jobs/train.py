"""Train a model on a Ray cluster.

    ray job submit --working-dir . -- python jobs/train.py restorer --data s3://bucket/train400 \\
        --storage s3://bucket/runs --preset denoise-gray-gpu --workers 4 --gpu

Same options as `restoration train`; exits non-zero with the reason on failure.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["train", *sys.argv[1:]]))
