;; Portions that misbehave, for tests of the bubble's defences.
(module
  (import "bubble_v1" "hmac_sha256" (func $hmac (param i32 i32 i32 i32 i32) (result i32)))
  (import "bubble_v1" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "gateway_key")
  ;; Spins until its fuel runs out.
  (func (export "spin") (result i32)
    (loop $l (br $l))
    (i32.const 0))
  ;; Grows its memory past any sane limit (traps on the limit).
  (func (export "grow") (result i32)
    (loop $l
      (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    (i32.const 0))
  ;; Uses a credential its policy does not grant.
  (func (export "steal") (result i32)
    (drop (call $hmac (i32.const 0) (i32.const 11) (i32.const 0) (i32.const 11) (i32.const 100)))
    (drop (call $output_write (i32.const 100) (i32.const 32)))
    (i32.const 0))
  ;; Writes more output than the policy allows.
  (func (export "flood") (result i32)
    (loop $l
      (drop (call $output_write (i32.const 0) (i32.const 4096)))
      (br $l))
    (i32.const 0))
  ;; Reads out of bounds.
  (func (export "oob") (result i32)
    (drop (i32.load (i32.const 70000)))
    (i32.const 0))
)
