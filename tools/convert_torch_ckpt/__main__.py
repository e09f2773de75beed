import sys

from tools.convert_torch_ckpt.cli import main
from walrus_jax.errors import quiet_after_command, verbose_requested

rc = main()
quiet_after_command(verbose_requested(sys.argv))
sys.exit(rc)
