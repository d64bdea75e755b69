import sys

from ssm_llm_cli import main

sys.exit(main())
