from aniserve.cli import main

main()
