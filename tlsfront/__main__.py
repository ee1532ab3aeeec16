import sys

from tlsfront.cli import main

sys.exit(main())
