from smtpctl.main import main

main()
