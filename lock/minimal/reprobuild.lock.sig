{
  "algorithm": "ed25519",
  "key_id": "62231b92dd2becda",
  "signature": "NL8bACEXHBHbpmHbSo1ORNh6bGiJi4vVMREpcviE/VpMZHGDwmOXrJasluDfsiqNDs8/oD4MwIz7Ti20PQjeDg=="
}
