"""Generate images in bulk on a Ray cluster.

    ray job submit --working-dir . -- python jobs/synthesize.py --model dcgan-fmnist --count 1000000 \\
        --out s3://bucket/generated --seed 7

Same options as `restoration synthesize`; exits non-zero with the reason on failure.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["synthesize", *sys.argv[1:]]))
