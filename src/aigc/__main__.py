from aigc.cli import main

main()
