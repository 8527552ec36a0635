import sys

from tfpar.cli import main

sys.exit(main())
