"""Ray job: `distcur rebalance` from the 'rebalance' section of a job config (see jobs/_common.py).

    ray job submit --working-dir . -- python jobs/rebalance.py --config jobs/configs/metaworld.yaml
"""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("rebalance"))
