from sodtool.cli import main

main()
