{
  "targets": [
    {
      "target_name": "range_lock",
      "sources": ["native/range_lock.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
