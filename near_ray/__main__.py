import sys

from near_ray.cli import main

sys.exit(main())
