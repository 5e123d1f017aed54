from .cli import main

main(prog_name="machinen")  # same name (and completion variable) as the console script
