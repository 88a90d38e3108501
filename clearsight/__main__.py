import sys

from clearsight.cli import main

sys.exit(main())
