module staticegress.local/cnigate

go 1.22
