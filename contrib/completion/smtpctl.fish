# fish completion for smtpctl: PLACEHOLDER (the generated file replaces it at merge).
complete -c smtpctl -f
