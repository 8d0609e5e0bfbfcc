{
  "algorithm": "ed25519",
  "key_id": "62231b92dd2becda",
  "signature": "z0NClOMpIiwR9To+Z13yWzMRRBTL4+5WFg0MdbAbbLuAylQJ/I0Bj0fPe2yzWkvMOYEeX/0tocprrz14l3nKDw=="
}
