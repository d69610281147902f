import sys

from dinobridge.train.loop import main

sys.exit(main())
