import sys

from megnet_pt.cache.cli import main

sys.exit(main())
