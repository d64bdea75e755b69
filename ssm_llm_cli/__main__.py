from ssm_llm_cli import run

run()
