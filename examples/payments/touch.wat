;; Test portion for benchmarks: touches N MiB of its linear memory.
;; input: [mib u32 LE]; grows memory and writes one byte per 4 KiB page.
(module
  (import "bubble_v1" "input_read" (func $input_read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "touch") (result i32)
    (local $mib i32) (local $end i32) (local $p i32)
    (drop (call $input_read (i32.const 0) (i32.const 4)))
    (local.set $mib (i32.load (i32.const 0)))
    ;; 16 wasm pages of 64 KiB per MiB
    (if (i32.eq (memory.grow (i32.mul (local.get $mib) (i32.const 16))) (i32.const -1))
      (then (return (i32.const 1))))
    (local.set $end (i32.mul (memory.size) (i32.const 65536)))
    (local.set $p (i32.const 65536))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (i32.store8 (local.get $p) (i32.const 1))
        (local.set $p (i32.add (local.get $p) (i32.const 4096)))
        (br $next)))
    (i32.const 0))
)
