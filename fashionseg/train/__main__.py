"""`python -m fashionseg.train`, `accelerate launch -m fashionseg.train` and `torchrun -m fashionseg.train`."""
import sys

from fashionseg.train.entry import main

sys.exit(main())
