{
  "algorithm": "ed25519",
  "key_id": "62231b92dd2becda",
  "signature": "aa3181x+O86yRDh1plNkJDLBlISDE/5RxQkrPaP5gaQ7XPbih2HL5zgdDmmmm2d9wPalvCrcXvWyOUyUVt06AQ=="
}
