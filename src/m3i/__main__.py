import sys

from m3i.cli import main

sys.exit(main())
