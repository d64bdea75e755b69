import sys

from ssm_llm.cli import main

sys.exit(main())
