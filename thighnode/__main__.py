import sys

from thighnode.cli import main

sys.exit(main())
