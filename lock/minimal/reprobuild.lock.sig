{
  "algorithm": "ed25519",
  "key_id": "62231b92dd2becda",
  "signature": "x+IoUSDSrLxnjrpIrt9EWwf8iwaipXBGUI9RB3CC+egd1dimGdoK7HTK9h2duv/H9gZhJbXPUHms2YjtmBgxCQ=="
}
