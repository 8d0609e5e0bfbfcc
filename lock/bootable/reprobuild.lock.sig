{
  "algorithm": "ed25519",
  "key_id": "62231b92dd2becda",
  "signature": "NOGMsiuwSPOy+10aJViWFMKvSmSfKNZKXoSVhIjuTCZ21aMVQY6CEx5rYRRlAQB6fzBqGrU3BF4zV3hJ+BO0AQ=="
}
