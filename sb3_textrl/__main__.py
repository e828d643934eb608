import sys

from sb3_textrl.cli import main

sys.exit(main())
