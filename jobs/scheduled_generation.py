"""A scheduled generation run: today's batch of synthetic images, idempotent by date.

    ray job submit --working-dir . --submission-id gen-$(date -u +%F) -- \\
        python jobs/scheduled_generation.py --model dcgan-fmnist --count 100000 --out s3://bucket/generated

The run id defaults to today's UTC date and the output lands in OUT/run_id=<YYYY-MM-DD>/. A rerun of a finished run
changes nothing; a rerun of an interrupted one completes it without duplicates; `_manifest.json` is written last, so
a reader knows a run is complete when its manifest exists. Same options as `restoration synthesize`.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["synthesize", "--scheduled", *sys.argv[1:]]))
