import sys

from tools.convert_torch_ckpt.cli import main

sys.exit(main())
