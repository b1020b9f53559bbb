from smtpd.main import main

main()
