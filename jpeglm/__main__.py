import sys

from jpeglm.cli import main

sys.exit(main())
