from stackrlhf.cli import main

main()
