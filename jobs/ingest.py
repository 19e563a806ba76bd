"""Ray job: `distcur ingest` from the 'ingest' section of a job config (see jobs/_common.py).

    ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/metaworld.yaml
"""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("ingest"))
