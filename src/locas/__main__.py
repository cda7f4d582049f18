import sys

from locas.cli import main

sys.exit(main())
